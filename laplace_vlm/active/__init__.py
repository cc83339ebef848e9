"""Active few-shot adaptation: acquisition, targeting, fine-tuning with posterior updates, the experiment loop."""
