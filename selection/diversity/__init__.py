"""Stage 2b, diversity (kMQ branch): sentence embeddings and quality scores."""
