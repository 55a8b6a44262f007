"""ZeroMQ transport between the line's processes.

- :mod:`~linewatch.transport.codec`: wire messages to multipart messages and back.
- :mod:`~linewatch.transport.sockets`: the one way to make a socket (HWM, linger, CURVE).
- :mod:`~linewatch.transport.security`: CURVE keys and the authenticator.
- :mod:`~linewatch.transport.dispatcher`: frames from cameras to workers by credit.
- :mod:`~linewatch.transport.worker_link`: a worker's end of the dispatcher protocol.
"""
