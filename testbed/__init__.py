"""The plumbing the tests and the benchmarks share, in a package of its own (neither
imports the other for it): real server processes (:mod:`testbed.processes`), ``/metrics``
read back (:mod:`testbed.metrics`), the images sent (:mod:`testbed.images`) and the
allocators (:mod:`testbed.allocators`). Not installed with chanseg: it runs from a
checkout, as ``tests/`` and ``benchmarks/`` do."""
