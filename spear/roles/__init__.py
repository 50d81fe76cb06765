"""spear's roles: the SMS (leader), the Spearlet (every node) and the HTTP gateway."""

from spear.roles.artifacts import ArtifactStore
from spear.roles.gateway import NodeInfo, build_app, serve_gateway
from spear.roles.sms import TaskService
from spear.roles.spearlet import Spearlet
from spear.roles.state import SmsState

__all__ = [
    "ArtifactStore",
    "NodeInfo",
    "SmsState",
    "Spearlet",
    "TaskService",
    "build_app",
    "serve_gateway",
]
