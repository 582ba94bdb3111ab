# Only the MQTT broker of hosts in the "brokers" group (EMQX or Mosquitto).
from pyinfra import host

from roles.plan import broker_roles

for role in broker_roles(host):
    role()
