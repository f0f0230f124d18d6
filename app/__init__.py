"""zoo.app: what a person runs. The `zoo` command line, the demo, the benchmarks and the
reports they write.

This floor parses arguments, times, plots and writes files; it imports any floor below it
(zoo.kernels, zoo.layers, zoo, zoo.train, zoo.infer) and nothing imports it.
"""
