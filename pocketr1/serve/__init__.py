"""`pocketr1 serve`: an OpenAI/DeepSeek-compatible HTTP API and a web chat page over the batching engine."""
