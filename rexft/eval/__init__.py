"""The eval stage, in four parts: ``protocols`` (what is scored, as typed records), ``engine`` (the calls
protocols are written in; the plain engine on transformers' generate()), ``pool`` (the CPU engine: shared
openings, rows joining and leaving a decoding batch, device profiles), ``report`` (summaries, tables,
routing heatmap, ``rexft eval compare``), and ``stage`` (``rexft eval`` itself)."""
