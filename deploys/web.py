# Only nginx and certbot (TLS front end and certificates) on hosts serving the API or a broker.
from pyinfra import host

from roles.plan import web_roles

for role in web_roles(host):
    role()
