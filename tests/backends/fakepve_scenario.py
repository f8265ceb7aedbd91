"""Serves fakepve (docs/BACKENDS.md) with one scenario, for the pve-api tests.

fakepve's own command line takes a guests file but no API token, no
permissions and no injected failures; this sets those through its Python
API, then serves it like the command line does:

    python fakepve_scenario.py SCENARIO.json

The scenario (every key but "cert", "key" and "guests" optional):

    {"cert": "server.pem", "key": "server.key",        # PEM, made by the test
     "host": "127.0.0.1", "port": 0,                   # 0: the system picks
     "time_scale": 0.01,                               # real seconds per PVE second
     "tokens": {"breakglass@pve!power": "SECRET"},
     "grants": [["breakglass@pve!power", "/vms/101", ["VM.PowerMgmt", "VM.Audit"]]],
     "guests": [{"vmid": 101, "name": "devvm", "status": "running", "lock": "backup",
                 "shutdown_secs": 300, "start_secs": 0, "stop_secs": 0,
                 "start_error": "...", "acpi": true, "agent": {}}],
     "failures": [{"method": "POST", "suffix": "/status/reset", "status": 500, "message": "..."}]}

It prints "fakepve listening on https://HOST:PORT" once it accepts
connections, then serves until it is killed, printing
"fakepve saw METHOD PATH" for each request it receives (refused ones
included), so a test can tell what reached it and how often.
"""

import asyncio
import json
import sys

from fakepve import FakePve

VM_KEYS = ('shutdown_secs', 'start_secs', 'stop_secs', 'start_error', 'acpi', 'agent', 'agent_hangs')


async def serve(scenario):
    pve = FakePve(host=scenario.get('host', '127.0.0.1'), port=scenario.get('port', 0))
    pve.time_scale = scenario.get('time_scale', 0.0)
    pve.apitokens.update(scenario.get('tokens', {}))
    for user, path, privs in scenario.get('grants', []):
        pve.grant(user, path, *privs)
    for guest in scenario['guests']:
        vm = pve.add_vm(guest['vmid'], guest['name'], node=guest.get('node', 'pve1'),
                        status=guest.get('status', 'stopped'), qmpstatus=guest.get('qmpstatus'),
                        config=guest.get('config', {}), lock=guest.get('lock'))
        if guest.get('lock'):
            vm.config['lock'] = guest['lock']
        for key in VM_KEYS:
            if key in guest:
                setattr(vm, key, guest[key])
    for rule in scenario.get('failures', []):
        pve.fail(rule['method'], rule['suffix'], status=rule.get('status'), message=rule.get('message'),
                 error=rule.get('error'), times=rule.get('times'))
    record = pve._record

    def record_and_say(request, body):
        print('fakepve saw {0} {1}'.format(request.method, request.path), flush=True)
        record(request, body)
    pve._record = record_and_say
    await pve.start(scenario['cert'], scenario['key'])
    print('fakepve listening on {0}'.format(pve.url), flush=True)
    await asyncio.Event().wait()


def main():
    with open(sys.argv[1]) as f:
        scenario = json.load(f)
    try:
        asyncio.run(serve(scenario))
    except KeyboardInterrupt:
        pass


if __name__ == '__main__':
    main()
