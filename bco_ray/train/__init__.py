"""Stage 3, train: BCO (KTO, DPO) on Ray Train. stage: the driver; loop: one worker's
recipe; step: one optimizer step; objectives: the losses, pure functions."""
