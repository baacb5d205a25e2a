"""A twin with an escrow (one per session), the local relayer on a free port, a webhook sink."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from quotra_dev import twin as twin_module
from quotra_dev.chain import Chain, account_from_key
from quotra_dev.relayer import create_relayer_app
from quotra_dev.relayer.local import ThreadedServer, deploy_escrow
from relayer_fixtures import ChainEnv, LocalRelayer, Sink, relayer_config


@pytest.fixture(scope="session")
def chain_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChainEnv]:
    with twin_module.start() as chain_:
        dev = [account_from_key(a.private_key) for a in chain_.accounts]
        deployment = deploy_escrow(chain_.rpc_url, dev[0], (dev[1].address,))
        path = deployment.save(tmp_path_factory.mktemp("deployments") / "base-sepolia-twin.json")
        yield ChainEnv(chain_, Chain(chain_.rpc_url), deployment, path, dev[0], dev[1], dev[2])


@pytest.fixture(scope="session")
def local_relayer(chain_env: ChainEnv) -> Iterator[LocalRelayer]:
    config = relayer_config(chain_env)
    with ThreadedServer(create_relayer_app(config), twin_module.free_port()) as server:
        yield LocalRelayer(server, config)


@pytest.fixture
def sink() -> Iterator[tuple[Sink, str]]:
    receiver = Sink()
    with ThreadedServer(receiver.app(), twin_module.free_port()) as server:
        yield receiver, server.url + "/hook"
