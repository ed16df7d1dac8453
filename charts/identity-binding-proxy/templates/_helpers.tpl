{{/* The objects' name: the release name, or "<release>-identity-binding-proxy". */}}
{{- define "ibp.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object (kustomize: deploy/base's kustomization adds its own). */}}
{{- define "ibp.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/part-of: {{ .Chart.Name }}
{{- if not .Values.kustomize }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}
{{- end -}}

{{/* The pods' selector. */}}
{{- define "ibp.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
{{- if not .Values.kustomize }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
{{- end -}}

{{- define "ibp.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else if .Values.kustomize -}}
{{ .Values.image.repository }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* The settings read once at start (IBP_*), one source for the ConfigMap and settings.env. */}}
{{- define "ibp.settings" -}}
IBP_ISSUER_URL: {{ required "issuer.url is required" .Values.issuer.url | quote }}
IBP_AUTHORITY_HOST: {{ .Values.authorityHost | quote }}
IBP_TOKEN_AUDIENCE: {{ .Values.tokenAudience | quote }}
IBP_AUTHN_MODE: {{ .Values.authnMode | quote }}
IBP_LOG_FORMAT: {{ .Values.logFormat | quote }}
{{- end -}}

{{/* The Service's DNS names, which the serving certificate carries besides the SNI name. */}}
{{- define "ibp.serviceNames" -}}
- {{ include "ibp.fullname" . }}.{{ .Release.Namespace }}.svc
- {{ include "ibp.fullname" . }}.{{ .Release.Namespace }}.svc.{{ .Values.tls.clusterDomain }}
{{- end -}}
