#!/usr/bin/env python3
"""HTTP/2 clients that never take a response byte, and what the server does about them.

Each connection announces SETTINGS_INITIAL_WINDOW_SIZE = 0 and never sends a WINDOW_UPDATE, so
no DATA frame can ever reach it; it opens STREAMS GetCACaps requests at once and then only reads
(answering PINGs, as any live client does) until the server closes the connection or MAX_SECONDS
have passed. Uses the python h2 library (Debian python3-h2).

Usage: h2_stall.py HOST PORT ROOT_PEM SERVER_NAME CONNECTIONS STREAMS MAX_SECONDS [WINDOW [PATH]]
WINDOW (default 0) is the stream window announced, never reopened: a client that takes that many
bytes of each answer and then nothing. PATH defaults to a GetCACaps request.
Prints JSON: {"connections": [{"closed_at": seconds since start or null, "resets": int,
"reset_codes": [int], "goaway": error code or null, "responses": int (response heads),
"error": str or null}],
"elapsed": seconds}
"""
import json
import os
import socket
import ssl
import sys
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.frame_buffer
import h2.settings
import hyperframe.frame

host, port, root, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
connections, streams, max_seconds = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
window = int(sys.argv[8]) if len(sys.argv) > 8 else 0
# H2_STALL_DEAD=1: a peer that has gone away without closing: it answers nothing, not even PINGs.
dead = os.environ.get("H2_STALL_DEAD") == "1"
path = sys.argv[9] if len(sys.argv) > 9 else "/certsrv/mscep/mscep.dll?operation=GetCACaps"
started = time.monotonic()
deadline = started + max_seconds


def stall(result):
    ctx = ssl.create_default_context(cafile=root)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
    sock = ctx.wrap_socket(raw, server_hostname=name)
    assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.local_settings = h2.settings.Settings(
        client=True,
        initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window},
    )
    conn.initiate_connection()
    for i in range(streams):
        conn.send_headers(
            1 + 2 * i,
            [(":method", "GET"), (":scheme", "https"), (":authority", name), (":path", path)],
            end_stream=True,
        )
    sock.sendall(conn.data_to_send())
    # From here on the frames are read and answered by hand: h2's state machine, once it has a
    # GOAWAY, refuses what a server still sends after it (a PING, a RST_STREAM for a stream the
    # GOAWAY left open) and would leave the server's graceful close waiting on a PING ack. A
    # stalled client acknowledges SETTINGS and PINGs, and nothing else.
    frames = h2.frame_buffer.FrameBuffer(server=False)
    frames.max_frame_size = 16384
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            result["closed_at"] = time.monotonic() - started
            return
        frames.add_data(data)
        out = b""
        for frame in frames:
            if isinstance(frame, hyperframe.frame.HeadersFrame):
                result["responses"] += 1
            elif isinstance(frame, hyperframe.frame.DataFrame):
                result["data_bytes"] += len(frame.data)
            elif isinstance(frame, hyperframe.frame.RstStreamFrame):
                result["resets"] += 1
                result["reset_codes"].append(int(frame.error_code))
            elif isinstance(frame, hyperframe.frame.GoAwayFrame):
                result["goaway"] = int(frame.error_code)
            elif isinstance(frame, hyperframe.frame.SettingsFrame) and "ACK" not in frame.flags:
                out += hyperframe.frame.SettingsFrame(0, flags=["ACK"]).serialize()
            elif isinstance(frame, hyperframe.frame.PingFrame) and "ACK" not in frame.flags:
                result["pings"] += 1
                if dead:
                    continue
                out += hyperframe.frame.PingFrame(0, frame.opaque_data, flags=["ACK"]).serialize()
        if out and not dead:
            try:
                sock.sendall(out)
            except (OSError, ssl.SSLError):
                pass


def run(result):
    try:
        stall(result)
    except Exception as e:  # reported, not raised: the other connections still count
        result["error"] = repr(e)


results = [
    {
        "closed_at": None,
        "resets": 0,
        "reset_codes": [],
        "goaway": None,
        "responses": 0,
        "data_bytes": 0,
        "pings": 0,
        "error": None,
    }
    for _ in range(connections)
]
threads = [threading.Thread(target=run, args=(r,)) for r in results]
for t in threads:
    t.start()
for t in threads:
    t.join(max_seconds + 10)
print(json.dumps({"connections": results, "elapsed": time.monotonic() - started}))
