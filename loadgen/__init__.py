"""Load generator for OpenAI-compatible endpoints: `tristage-loadgen` (see loadgen.cli).

workloads (lengths, prompts, images, trace) -> arrivals -> runner -> client
    -> metrics -> report (JSON lines, summary.json, tables) and plots
"""
