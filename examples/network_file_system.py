"""Modal's guide, "sandbox file access" (3): a network file system is shared live — the client reads
what the sandbox wrote while the sandbox is still running."""

import shoal as modal

my_app = modal.App.lookup("my-app", create_if_missing=True)

with modal.NetworkFileSystem.ephemeral() as nfs:
    sb = modal.Sandbox.create(network_file_systems={"/mnt/nfs": nfs}, app=my_app)
    p = sb.exec("bash", "-c", "echo foo > /mnt/nfs/a.txt")
    p.wait()
    for chunk in nfs.read_file("a.txt"):  # the sandbox is still running
        print(chunk)
    sb.terminate()
