"""The online loop: feedback logging, simulated users, A/B tests with a holdout, monitoring, retraining."""
