"""A Python backend stub that outlives its Triton server exits (imported by the model files here).

The stub checks by itself that its parent runs (`kill(ppid, 0)` every 300 ms), but a parent left
as a zombie (a container whose init does not reap it) passes that check forever. A stub's parent
changes when Triton dies, zombie or not: after a grace period for the stub's own exit path, this
watchdog ends the process. Its shared-memory region is then removed by the next `vsal serve`.
"""

import os
import threading
import time

POLL_S = 1.0
GRACE_S = 3.0  # the stub's own exit comes first when it can


def exit_with_parent():
    """Start the watchdog (once per process) for the parent the stub has now."""
    if any(t.name == "vsal-parent-watchdog" for t in threading.enumerate()):
        return
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(POLL_S)
        time.sleep(GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="vsal-parent-watchdog", daemon=True).start()
