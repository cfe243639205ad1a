"""System prompts of the published BAGEL app and IRG scripts (data, kept verbatim)."""

GEN_THINK = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process "
    "here </think> image here"
)

VLM_THINK = (
    "You should first think about the reasoning process in the mind and then provide the user with "
    "the answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. <think> "
    "reasoning process here </think> answer here"
)

IRG = (
    "You should first think about the planning process in the mind and then generate the image.\n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process "
    "here </think> image here.\n"
    "After generating an image and completing one round of thinking, you should continue to "
    "analyze and think further, then generate another improved image. For each subsequent round, "
    "carefully compare the previously generated image with the new one, identify specific visual "
    'differences and improvements, and generate a detailed "think process" that explains how to '
    "transform the previous image into the improved version.\n"
    "The think process for each improvement round must follow this structure:\n"
    "1. Start with <think> and end with </think>\n"
    "2. Have clear paragraph breaks with the following sections:\n"
    "   - Initial analysis paragraph (acknowledge shortcomings of the previous image)\n"
    "   - ### Detailed Explanation of Required Improvements:\n"
    "   - ### Step-by-Step Modification Guidance:\n"
    "   - ### Final Comprehensive Prompt for the Improved Image:\n"
    "Each section should provide concrete, actionable guidance for text-to-image generation, "
    "focusing on composition, lighting, colors, textures, positioning, and style. Do not mention "
    "the improved image directly; only provide the think process. Repeat this process for each new "
    "image, ensuring each think process is specific enough to guide precise image improvements.\n"
)
