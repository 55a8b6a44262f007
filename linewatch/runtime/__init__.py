"""Running a whole line: the supervisor, ``linewatch run`` and the embedded demo."""
