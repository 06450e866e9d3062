"""Planning before anything is launched: fine-tune or RAG, and what a run needs. Pure functions, no torch."""
