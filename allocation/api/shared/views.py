"""Base views and input validation every v1 API view shares, in this app and in ``optimization``."""

from __future__ import annotations

from rest_framework.views import APIView

from allocation.api.shared.auth import ApiKeyAuthentication, IsAuthenticatedPrincipal, agent_for
from ledger.models import Agent


def valid(serializer_class, data, **kwargs) -> dict:
    """``data`` validated by ``serializer_class``; a ``ValidationError`` (400) otherwise."""
    serializer = serializer_class(data=data, **kwargs)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class GridAPIView(APIView):
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [IsAuthenticatedPrincipal]


class AgentScopedView(GridAPIView):
    """A view under /agents/{agent_id}/: the caller must be that agent or an operator."""

    def agent(self) -> Agent:
        return agent_for(self.request.user, self.kwargs["agent_id"])
