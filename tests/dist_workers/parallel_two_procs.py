"""One 2-process launch for every 2-rank check (one interpreter start-up instead of three):
the mappings alone, TP = 2 parity with extras, SP = 2 parity with extras. Each section's result
goes under its own key of the ``RESULT`` line."""

import parallel_common as pc  # noqa: I001  (sets env before torch)

import parallel_mappings
import parallel_parity

pc.init()
pc.finish({
    "mappings": parallel_mappings.run(),
    "tp2": parallel_parity.run(tp=2, sp=1, extras=True),
    "sp2": parallel_parity.run(tp=1, sp=2, extras=True),
})
