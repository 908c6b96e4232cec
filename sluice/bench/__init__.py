"""Benchmarks: workloads (`datasets`), backends (`backends`), `sluice bench throughput`
(`throughput`) and the reference model (`reference_model`)."""
