"""What the headset and the cloud both speak: wire schemas, the model manifest,
content hashing and signatures, atomic files, the synthetic worlds. No torch."""
