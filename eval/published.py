"""Published interactivity figures of other models -- *their* numbers, on the real benchmarks.

``tml eval`` prints these beside its own results for orientation only: tml's scenario
numbers come from the synthetic held-out scenarios (or from whatever FD-bench folder the
user scores), not from the benchmarks these were measured on, so the columns are not a
like-for-like comparison.

Sources:

* Full-Duplex-Bench v1 table, ``v1_v1.5/README.md`` of
  github.com/DanielLin94144/Full-Duplex-Bench (read at commit
  ``6d6506628ff8a388a19dcb44b0c400165b67150f``); pause handling is its "Synthetic" TOR
  column, smooth turn-taking its "Candor" column.
* TML-Interaction-Small: the figures reported for it, as quoted in tml's design
  reference (``DESIGN.md``, "Interactivity evaluation"): turn-taking latency, FD-bench
  v1.5 overall score, TimeSpeak, CueSpeak and RepCount-A as reported (scales as
  published; tml's accuracies are printed x 100 beside them).
"""

from __future__ import annotations

FDB_SOURCE = ("Full-Duplex-Bench v1 README table, github.com/DanielLin94144/Full-Duplex-Bench "
              "v1_v1.5/README.md @ 6d65066")
TML_SOURCE = "reported for TML-Interaction-Small, as quoted in DESIGN.md 'Interactivity evaluation'"

MODELS = ("Moshi", "GPT-Realtime", "PersonaPlex", "TML-Interaction-Small")

# (task, metric) -> {model: value}; a metric's direction is in tml.eval.report.HEADLINE.
PUBLISHED: dict[tuple[str, str], dict[str, float]] = {
    ("pause_handling", "tor"): {"Moshi": 0.985, "GPT-Realtime": 0.010, "PersonaPlex": 0.584},
    ("backchannel", "tor"): {"Moshi": 1.000, "GPT-Realtime": 0.000, "PersonaPlex": 0.327},
    ("backchannel", "frequency"): {"Moshi": 0.001, "GPT-Realtime": 0.007, "PersonaPlex": 0.025},
    ("backchannel", "jsd"): {"Moshi": 0.957, "GPT-Realtime": 0.980, "PersonaPlex": 0.649},
    ("smooth_turn_taking", "tor"): {"Moshi": 0.941, "GPT-Realtime": 1.000, "PersonaPlex": 0.992},
    ("smooth_turn_taking", "latency"): {"Moshi": 0.265, "GPT-Realtime": 1.470, "PersonaPlex": 0.070,
                                        "TML-Interaction-Small": 0.40},
    ("user_interruption", "tor"): {"Moshi": 1.000, "GPT-Realtime": 0.970, "PersonaPlex": 1.000},
    ("user_interruption", "latency"): {"Moshi": 0.257, "GPT-Realtime": 1.500, "PersonaPlex": 0.400},
    ("time_speak", "accuracy"): {"TML-Interaction-Small": 64.7},
    ("cue_speak", "accuracy"): {"TML-Interaction-Small": 81.7},
    ("rep_count", "reported"): {"TML-Interaction-Small": 35.4},
    ("fdb_v1.5", "overall"): {"TML-Interaction-Small": 77.8},
}
"""Published figures (module docstring for the sources); TOR and frequency as fractions and
1/s, latency in seconds, TimeSpeak/CueSpeak/RepCount-A/v1.5 on their published scales."""

SOURCES = {"Moshi": FDB_SOURCE, "GPT-Realtime": FDB_SOURCE, "PersonaPlex": FDB_SOURCE,
           "TML-Interaction-Small": TML_SOURCE}
