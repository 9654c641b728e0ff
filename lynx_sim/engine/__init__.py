"""The discrete-event engine (simpy): the steady decode batch (decode.py, replay.py) and the serving
engine (serving.py: a cluster of nodes; request.py, scheduler.py, workload.py)."""
