#!/usr/bin/env python3
"""Sends one HTTP/2 GET with a :path of an exact length and prints what came back as JSON.

Rust's http::Uri cannot hold a request-target over 65534 bytes, so the HTTP/2 boundary test uses
the python h2 library (Debian python3-h2), which can send any :path.
Usage: h2_request.py HOST PORT ROOT_PEM SERVER_NAME PATH_LENGTH
"""
import json
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events

host, port, root, name, length = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
head = "/certsrv/mscep/mscep.dll?operation=PKIOperation&message="
pattern = "MIAGCSqGSIb3+tl4tH9E/97TB"
path = head + (pattern * (length // len(pattern) + 1))[: length - len(head)]
assert len(path) == length

ctx = ssl.create_default_context(cafile=root)
ctx.set_alpn_protocols(["h2"])
sock = ctx.wrap_socket(socket.create_connection((host, port), timeout=20), server_hostname=name)
assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
conn.initiate_connection()
conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", name), (":path", path)], end_stream=True)
sock.sendall(conn.data_to_send())

result = {"status": None, "reset": None, "goaway": None, "body": ""}
body = b""
done = False
while not done:
    data = sock.recv(65536)
    if not data:
        break
    for event in conn.receive_data(data):
        if isinstance(event, h2.events.ResponseReceived):
            result["status"] = int(dict(event.headers)[":status"])
            result["content_type"] = dict(event.headers).get("content-type")
        elif isinstance(event, h2.events.DataReceived):
            body += event.data
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            done = True
        elif isinstance(event, h2.events.StreamReset):
            result["reset"] = int(event.error_code)
            done = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            result["goaway"] = int(event.error_code)
            done = True
    out = conn.data_to_send()
    if out:
        sock.sendall(out)
result["body"] = body.decode("utf-8", "replace")
print(json.dumps(result))
