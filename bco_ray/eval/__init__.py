"""Stage 4, eval: the trained model against the reference on held-out prompts, and the gate
(stage; quality: the measures and intervals; judge: the judges)."""
