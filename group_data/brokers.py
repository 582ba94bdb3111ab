# Hosts running the MQTT broker: devices reach them over TLS (8883) and WebSocket/TLS (8084).
firewall_broker_tcp_ports = [8883, 8084]
