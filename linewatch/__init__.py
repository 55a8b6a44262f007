"""linewatch: real-time visual inspection for production lines.

Acquisition -> transport -> inference -> decision -> streams -> consumers.
Each stage is a subpackage; data flows one way through them.
"""

__version__ = "0.1.0"
