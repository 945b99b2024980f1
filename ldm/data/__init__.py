"""Data: sources of documents and conversations, and the prepared (tokenized) form on disk."""
