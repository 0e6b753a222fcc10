"""Run fedsqueeze's ServerApp and ClientApp: in process (a Flower Grid) or on Flower's simulation engine."""
