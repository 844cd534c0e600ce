"""The ``cleancompact`` command line: the top layer, above cc_core, tasks, flows, deploy and benchmarks."""
