"""The tool commands of ``coalign`` (index, search, ...), each a typed function parsed by :mod:`coalign.command`."""
