"""A plain training loop for tests: each batch is one optimizer step, split into micro-batches."""


def train(model, optimizer, batches, accumulation=1, scale=True):
    """`scale=False` leaves micro-batch losses unscaled, so gradients sum over micro-batches exactly as the
    statistics do (for comparing runs that split the same micro-batches into steps differently)."""
    for batch in batches:
        for micro in batch.chunk(accumulation):
            loss = model(micro, labels=micro).loss
            (loss / accumulation if scale else loss).backward()
        optimizer.step()
        optimizer.zero_grad()
