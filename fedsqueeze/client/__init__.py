"""fedsqueeze's Flower ClientApp (`fedsqueeze.client.app:app`) and the Flower-free client half it calls."""
