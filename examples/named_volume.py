"""Modal's guide, "sandbox file access" (2): a named volume outlives the sandbox, the client process
and the server. The write phase runs a sandbox that writes /cache/a.txt; the read phase — a new
process — mounts the same volume in a new sandbox and reads the file both ways.

    python examples/named_volume.py                 # both phases, the read in a new process
    python examples/named_volume.py write SESSION   # one phase (tests restart the server between)
    python examples/named_volume.py read SESSION
"""

import subprocess
import sys
import uuid

import shoal as modal

my_app = modal.App.lookup("my-app", create_if_missing=True)


def write(session_id: str) -> None:
    vol = modal.Volume.from_name(f"vol-{session_id}", create_if_missing=True)
    sb = modal.Sandbox.create(volumes={"/cache": vol}, app=my_app)
    p = sb.exec("bash", "-c", "echo foo > /cache/a.txt")
    p.wait()
    sb.terminate()


def read(session_id: str) -> None:
    vol = modal.Volume.from_name(f"vol-{session_id}")
    sb = modal.Sandbox.create(volumes={"/cache": vol}, app=my_app)
    p = sb.exec("cat", "/cache/a.txt")
    print("sandbox sees:", repr(p.stdout.read()))
    p.wait()
    sb.terminate()
    for data in vol.read_file("a.txt"):
        print("client reads:", data)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        {"write": write, "read": read}[sys.argv[1]](sys.argv[2])
    else:
        session_id = uuid.uuid4().hex[:8]
        write(session_id)
        subprocess.run([sys.executable, __file__, "read", session_id], check=True)
