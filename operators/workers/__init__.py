"""The worker pool: the per-frame heavy work (preprocess, encode, project) on Ray actors.

`compute.py` (no Ray import) does one batch's work where the model lives; `actor.py` wraps it as a Ray actor;
`pool.py` starts, calls, watches and stops the actors; `sequencer.py` is the service's side: it dispatches
batches, restores frame order and clusters, stores and publishes exactly as the in-process pipeline does.
Nothing here is imported by ``serve --workers 1``.
"""
