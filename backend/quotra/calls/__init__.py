"""The call core: one record and one state machine for every paid or free call.

`quotra.calls.records` names the states and the shapes of a call; `quotra.calls.store` reserves,
finishes and voids calls (one transaction each) and sweeps reservations that never finished;
`quotra.calls.outbox` hands captured calls to the settlement worker and records what the chain did.
"""
