"""fedsqueeze's Flower ServerApp (`fedsqueeze.server.app:app`) and the Flower-free server half it calls."""
