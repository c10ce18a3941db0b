"""Engine side: sequences, paged KV blocks, scheduler, model runner, sampler (torch only, no HTTP)."""
