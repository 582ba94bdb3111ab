# Only monitoring: Prometheus, Alertmanager and the exporters of what the host's groups put on it.
from roles.monitoring import monitoring

monitoring()
