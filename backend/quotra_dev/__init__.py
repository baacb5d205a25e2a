"""Dev tooling around the relay, never imported by it: the Base Sepolia twin (`twin`), a plain
synchronous web3 layer for tests and benchmarks (`chain`), the local gas relayer (`relayer`), a
local OpenAI-compatible model server (`localmodel`) and the demo (`demo`)."""
