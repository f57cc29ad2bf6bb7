"""Stage 2, score-ref: the frozen reference model's log-probs of every completion, once
(stage: Ray Data actor pools; refscore: the engines; logprobs: the math)."""
