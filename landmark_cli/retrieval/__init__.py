"""Landmark retrieval: the settings, block representatives and scores (landmarks), the
block selections (selection), the two kinds of landmark and the dense KV buffer
(attention), reading documents into the store (engine) and answering from it (session for
one document, corpus and corpus_trained for a folder)."""
