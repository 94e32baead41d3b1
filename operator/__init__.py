"""kvfleet.operator: the kopf operator. Never imports torch."""
