"""A worker preload for the clusters that :func:`dask_pconv.cluster.connect` starts.

A Ctrl-C in the terminal reaches every process of its process group, the cluster's worker
processes included, and kills them in the middle of a task.  Those workers belong to the client
process, which stops training cleanly at the next step boundary and then closes them; so they
ignore SIGINT.
"""

import signal
import threading

if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
