"""The pipeline's stages: each a plain async function over bounded anyio memory object streams."""
