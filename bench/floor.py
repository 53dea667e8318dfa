"""The floor: the cheapest Python process that does a CNI ADD's unavoidable work. Started as
``python -S floor_add.py`` with a runtime's environment and stdin, it imports only json, socket
and ssl (plus the built-in binascii for the kubeconfig's inline CA), GETs the Pod over a new TLS
connection with the kubeconfig's token, runs one ``iptables-restore`` and one
``ip6tables-restore`` (os.posix_spawn of nsenter) into CNI_NETNS and prints the prevResult. Its
own step times go to stderr as one ``floor-timings {json}`` line."""

from __future__ import annotations

from pathlib import Path

_SOURCE = r"""
from time import perf_counter
T0 = perf_counter()
import binascii, json, os, socket, ssl, sys
T1 = perf_counter()
RULES = ((%(cmd4)r, %(doc4)r), (%(cmd6)r, %(doc6)r))


def fail(msg):
    sys.stdout.write(json.dumps({"cniVersion": "1.0.0", "code": 999, "msg": msg}))
    sys.exit(1)


def main():
    conf = json.loads(sys.stdin.buffer.read())
    args = dict(kv.split("=", 1) for kv in os.environ.get("CNI_ARGS", "").split(";") if "=" in kv)
    netns = os.environ["CNI_NETNS"]
    with open(conf["kubernetes"]["kubeconfig"], "rb") as f:
        kc = json.load(f)
    cluster, user = kc["clusters"][0]["cluster"], kc["users"][0]["user"]
    host, port = cluster["server"][len("https://"):].rsplit(":", 1)
    t2 = perf_counter()
    if "certificate-authority-data" in cluster:
        ca = binascii.a2b_base64(cluster["certificate-authority-data"]).decode()
        ctx = ssl.create_default_context(cadata=ca)
    else:
        ctx = ssl.create_default_context(cafile=cluster["certificate-authority"])
    request = (
        "GET /api/v1/namespaces/%%s/pods/%%s HTTP/1.1\r\nHost: %%s:%%s\r\nAuthorization: Bearer %%s\r\n"
        "Accept: application/json\r\nConnection: close\r\n\r\n"
        %% (args["K8S_POD_NAMESPACE"], args["K8S_POD_NAME"], host, port, user["token"])
    ).encode()
    chunks = []
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(request)
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if head.split(None, 2)[1] != b"200":
        fail("GET pod: " + head.split(b"\r\n", 1)[0].decode())
    pod = json.loads(body)
    if "sidecar.istio.io/status" not in pod["metadata"].get("annotations", {}):
        fail("pod is not meshed")
    t3 = perf_counter()
    times = []
    for cmd, doc in RULES:
        t = perf_counter()
        r, w = os.pipe()
        pid = os.posix_spawnp("nsenter", ["nsenter", "--net=" + netns, "--", cmd, "--noflush"], os.environ,
                              file_actions=[(os.POSIX_SPAWN_DUP2, r, 0)])
        os.close(r)
        os.write(w, doc.encode())
        os.close(w)
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
            fail(cmd + " failed")
        times.append(perf_counter() - t)
    result = dict(conf["prevResult"], cniVersion=conf["cniVersion"])
    sys.stdout.write(json.dumps(result))
    t4 = perf_counter()
    ms = lambda s: round(s * 1000, 3)
    sys.stderr.write("floor-timings " + json.dumps({
        "imports_ms": ms(T1 - T0), "config_ms": ms(t2 - T1), "get_ms": ms(t3 - t2),
        "restore_v4_ms": ms(times[0]), "restore_v6_ms": ms(times[1]), "in_process_ms": ms(t4 - T0),
    }) + "\n")


main()
"""


def write_floor(path: Path, doc4: str, doc6: str) -> Path:
    """Writes the floor ADD script with the two restore documents built in."""
    path.write_text(
        _SOURCE.lstrip()
        % {"cmd4": "iptables-restore", "doc4": doc4, "cmd6": "ip6tables-restore", "doc6": doc6}
    )
    return path
