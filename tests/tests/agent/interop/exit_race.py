"""Asks the Workload API for an X.509-SVID over a raw HTTP/2 connection,
either from the process that connected ("direct") or from a forked child
after the connecting process has exited ("after-exit"): the kernel's
SO_PEERCRED then names a process that is gone. "reuse" is "after-exit"
where the child waits for a go file (third argument) before sending. Prints "svid" if an SVID
came back, "none" otherwise."""

import os
import socket
import struct
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def literal(name, value):
    # HPACK literal without indexing, new name, no Huffman (lengths < 127).
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def main():
    path, mode = sys.argv[1], sys.argv[2]
    headers = b"".join(
        literal(n, v)
        for n, v in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"workload.spiffe.io", b"true"),
        ]
    )
    request = (
        PREFACE
        + frame(0x4, 0, 0, b"")
        + frame(0x1, 0x4, 1, headers)
        + frame(0x0, 0x1, 1, b"\x00\x00\x00\x00\x00")
    )
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    if mode == "after-exit":
        if os.fork() != 0:
            os._exit(0)  # the process the kernel recorded as the peer is gone
        time.sleep(0.5)
    elif mode == "reuse":
        # As after-exit, but the child sends only once the file named by
        # the third argument exists: by then the caller has given the
        # connecting process's pid to another program.
        if os.fork() != 0:
            os._exit(0)
        go = sys.argv[3]
        for _ in range(600):
            if os.path.exists(go):
                break
            time.sleep(0.05)
    s.sendall(request)
    s.settimeout(5)
    buf = b""
    got_svid = False
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            done = False
            while len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + length:
                    break
                kind, flags = buf[3], buf[4]
                stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                buf = buf[9 + length :]
                if stream == 1 and kind == 0x0 and length > 5:
                    got_svid = True
                if stream == 1 and (kind == 0x3 or (kind == 0x1 and flags & 0x1)):
                    done = True
                if kind == 0x7:
                    done = True
            if done or got_svid:
                break
    except socket.timeout:
        pass
    print("svid" if got_svid else "none", flush=True)


if __name__ == "__main__":
    main()
