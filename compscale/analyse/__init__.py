"""Step 2 of the pipeline: analyses over the traced graph (stages and channel groups), as plain data."""

from compscale.analyse.channels import ChannelGraph, ChannelGroup, LayerChannels, analyse_channels
from compscale.analyse.rules import register_channel_rule

__all__ = ["ChannelGraph", "ChannelGroup", "LayerChannels", "analyse_channels", "register_channel_rule"]
