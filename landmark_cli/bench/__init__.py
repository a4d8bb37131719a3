"""The passkey retrieval benchmark behind `landmark passkey`: prompts and scoring (passkey),
running a grid of trials with resumable results (passkey_run)."""
