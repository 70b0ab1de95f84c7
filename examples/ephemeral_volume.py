"""Modal's guide, "sandbox file access" (1): a sandbox writes into an ephemeral volume, the client
reads the file back after the sandbox is gone. Runs unchanged with `import modal`."""

import shoal as modal

my_app = modal.App.lookup("my-app", create_if_missing=True)

with modal.Volume.ephemeral() as vol:
    sb = modal.Sandbox.create(volumes={"/cache": vol}, app=my_app)
    p = sb.exec("bash", "-c", "echo foo > /cache/a.txt")
    p.wait()
    sb.terminate()
    for data in vol.read_file("a.txt"):
        print(data)
